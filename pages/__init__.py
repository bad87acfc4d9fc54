"""Pages of the xaicomp Streamlit app (run with ``streamlit run app.py``; ``st.navigation`` lists them)."""
